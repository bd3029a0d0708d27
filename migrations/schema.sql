-- Loads the walshuttle demo schema (users, products, recommendations).
-- Usage (works from any cwd; \ir resolves paths relative to this file):
--   psql -h HOST -p PORT -U USER -d DB -f migrations/schema.sql
-- Re-runnable: every statement is IF NOT EXISTS.

\set ON_ERROR_STOP on

\ir users.sql
\ir products.sql
\ir recommendations.sql
