-- Lexical search over the stored content (worker/search.py), for every provider.
-- {{text_search_config}} is the setting `search.text_search_config`, fixed when this file is
-- applied (like the dimension), so the rows and the queries are read with one configuration.
-- No column and no index here: lexical search works at once by computing the words of the
-- rows it scans; `embedding-worker index create --lexical` stores them (a generated column
-- of embeddings_lexical(content)) with a GIN index when the table is large enough for that
-- to be slow, at a write cost the operator chooses (docs/retrieval.md).
CREATE FUNCTION embeddings_text_config() RETURNS regconfig
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN '{{text_search_config}}'::regconfig;

-- A row's words: what lexical search matches, and what the optional stored column holds.
CREATE FUNCTION embeddings_lexical(content text) RETURNS tsvector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN to_tsvector(embeddings_text_config(), coalesce(content, ''));

-- Any of the query's words: the OR of its lexemes under the same configuration (empty when
-- it has none, e.g. only stop words), quoted so that no lexeme is read as an operator.
CREATE FUNCTION embeddings_lexical_query(query text) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce(
        (SELECT string_agg('''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || '''',
                           ' | ')
         FROM unnest(tsvector_to_array(to_tsvector(embeddings_text_config(), query))) lexeme),
        '')::tsquery;
