-- Lexical search over the stored content (worker/search.py), for every provider: a
-- tsvector generated from `content` with a GIN index. {{text_search_config}} is the
-- setting `search.text_search_config`, fixed when this file is applied (like the dimension):
-- a stored generated column needs a constant configuration, and the query side must use the
-- same one, so both read it from embeddings_text_config(). Adding the column rewrites the
-- table once (every stored row gets its tsvector).
CREATE FUNCTION embeddings_text_config() RETURNS regconfig
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN '{{text_search_config}}'::regconfig;

-- Any of the query's words: the OR of its lexemes under the same configuration (empty when
-- it has none, e.g. only stop words), quoted so that no lexeme is read as an operator.
CREATE FUNCTION embeddings_lexical_query(query text) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce(
        (SELECT string_agg('''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || '''',
                           ' | ')
         FROM unnest(tsvector_to_array(to_tsvector(embeddings_text_config(), query))) lexeme),
        '')::tsquery;

ALTER TABLE embeddings ADD COLUMN content_tsv tsvector
    GENERATED ALWAYS AS (to_tsvector(embeddings_text_config(), coalesce(content, ''))) STORED;

CREATE INDEX embeddings_content_tsv_idx ON embeddings USING gin (content_tsv);
