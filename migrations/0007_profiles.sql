-- Recommendation profiles (worker/profiles.py, docs/recommend.md): one row per user of a
-- namespace and model, kept up to date from the interactions topic in the same transaction as
-- that topic's offsets (consumer_offsets, group <kafka.group_id>.interactions).
--   mean:         the time-decayed weighted mean of the unit vectors of the user's items,
--                 as of profile_time ({{dimension}} is the configured vector dimension).
--   weight:       the decayed sum of the interactions' weights as of profile_time.
--   profile_time: the latest interaction time applied; older interactions are decayed to it.
--   interactions: how many interactions were applied (each once).
-- profile_items: the items each user interacted with, the latest recommend.seen_max of them,
--                left out of the user's recommendations.
CREATE TABLE profiles (
    namespace    text             NOT NULL,
    model        text             NOT NULL,
    user_id      text             NOT NULL,
    mean         vector({{dimension}}) NOT NULL,
    weight       double precision NOT NULL CHECK (weight >= 0),
    profile_time timestamptz      NOT NULL,
    interactions bigint           NOT NULL,
    updated_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, model, user_id)
);

CREATE TABLE profile_items (
    namespace text        NOT NULL,
    model     text        NOT NULL,
    user_id   text        NOT NULL,
    item_id   text        NOT NULL,
    last_time timestamptz NOT NULL,
    PRIMARY KEY (namespace, model, user_id, item_id)
);
