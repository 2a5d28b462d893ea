-- Open anomaly incidents (worker/analysis/incidents.py): consecutive alerts of a namespace
-- grouped into one, changed only in the transaction that stores the offsets of the events
-- it came from, like analysis_state. A row is deleted when its incident closes (the close
-- message on the anomalies topic is the record). `count` is added to, so replicas that
-- extend the same incident add up; `last` is the alert with the highest position.
CREATE TABLE anomaly_incidents (
    namespace      text             NOT NULL,
    model          text             NOT NULL,
    first_position bigint           NOT NULL,
    first          jsonb            NOT NULL,
    last_position  bigint           NOT NULL,
    last           jsonb            NOT NULL,
    peak_score     double precision NOT NULL,
    peak           jsonb            NOT NULL,
    count          bigint           NOT NULL,
    threshold      double precision NOT NULL,
    updated_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, model, first_position)
);
