-- Demo data generator for walshuttle: simulates one ML recommendation batch.
--
-- Usage (schema must be loaded first with migrations/schema.sql):
--   psql -h HOST -p PORT -U USER -d DB -v scale=N -f migrations/generate.sql
-- scale defaults to 1. At scale N it ensures 1,000*N users and max(100*N, 10)
-- products exist, then appends 100,000*N rows to public.recommendations.
--
-- Every recommendation inserted by one run shares ONE created_at (= updated_at),
-- exactly like an ML batch job. The batch timestamp is now() truncated to the
-- second, or one second after the newest existing batch if that is later, so each
-- re-run appends a new batch with a strictly later created_at. Users/products use
-- deterministic emails/skus with ON CONFLICT DO NOTHING, so re-runs do not
-- duplicate them. The whole run is one transaction: the batch becomes visible (and
-- is decoded by logical replication) all at once. Only inserts into the public
-- tables; the only DDL is two ON COMMIT DROP temp tables (never replicated).

\set ON_ERROR_STOP on

\if :{?scale}
\else
  \set scale 1
\endif

-- Fails (non-zero exit, thanks to ON_ERROR_STOP) unless scale is a positive number.
SELECT (CASE WHEN (:scale)::numeric > 0 THEN 'true' ELSE 'scale must be > 0' END)::boolean AS scale_ok \gset

SELECT (1000 * (:scale)::numeric)::bigint                  AS n_users,
       greatest((100 * (:scale)::numeric)::bigint, 10)     AS n_products,
       (100000 * (:scale)::numeric)::bigint                AS n_recs
\gset

BEGIN;

-- Users ---------------------------------------------------------------------
INSERT INTO public.users (email, name, country, attributes, created_at, updated_at)
SELECT 'user' || i || '@example.com',
       CASE WHEN random() < 0.05 THEN NULL ELSE 'User ' || i END,
       CASE WHEN random() < 0.10 THEN NULL
            ELSE (ARRAY['US','GB','DE','FR','NL','PL','BR','IN','JP','CA'])[1 + floor(random() * 10)::int] END,
       CASE WHEN random() < 0.20 THEN NULL
            ELSE jsonb_build_object(
                   'plan',       (ARRAY['free','pro','team'])[1 + floor(random() * 3)::int],
                   'newsletter', random() < 0.5,
                   'age_bucket', (ARRAY['18-24','25-34','35-44','45-54','55+'])[1 + floor(random() * 5)::int]) END,
       now() - random() * interval '365 days',
       now()
FROM generate_series(1, :n_users) AS i
ON CONFLICT (email) DO NOTHING;

-- Products ------------------------------------------------------------------
INSERT INTO public.products (sku, name, price, tags, attributes, created_at, updated_at)
SELECT 'SKU-' || lpad(i::text, 8, '0'),
       'Product ' || i,
       CASE WHEN random() < 0.02 THEN NULL ELSE round((0.99 + random() * 499)::numeric, 2) END,
       CASE WHEN random() < 0.10 THEN NULL
            ELSE ARRAY[(ARRAY['books','electronics','garden','toys','kitchen','sports'])[1 + floor(random() * 6)::int],
                       (ARRAY['sale','new','bestseller','eco','premium'])[1 + floor(random() * 5)::int]] END,
       CASE WHEN random() < 0.20 THEN NULL
            ELSE jsonb_build_object('weight_g', 50 + floor(random() * 5000)::int,
                                    'color', (ARRAY['red','green','blue','black','white'])[1 + floor(random() * 5)::int]) END,
       now() - random() * interval '365 days',
       now()
FROM generate_series(1, :n_products) AS i
ON CONFLICT (sku) DO NOTHING;

-- Batch timestamp: computed once, shared by every row of this batch ----------
SELECT greatest(date_trunc('second', now()),
                (SELECT max(created_at) FROM public.recommendations) + interval '1 second') AS batch_ts
\gset
\echo 'recommendation batch created_at =' :batch_ts ', rows =' :n_recs

-- Dense 1..n numbering of the existing ids (identity values may have gaps, e.g.
-- from ON CONFLICT), so random picks always hit a real user/product.
CREATE TEMP TABLE gen_users ON COMMIT DROP AS
  SELECT row_number() OVER (ORDER BY id) AS rn, id FROM public.users;
CREATE TEMP TABLE gen_products ON COMMIT DROP AS
  SELECT row_number() OVER (ORDER BY id) AS rn, id FROM public.products;
CREATE UNIQUE INDEX ON gen_users (rn);
CREATE UNIQUE INDEX ON gen_products (rn);
ANALYZE gen_users;
ANALYZE gen_products;
SELECT (SELECT count(*) FROM gen_users) AS cnt_users,
       (SELECT count(*) FROM gen_products) AS cnt_products
\gset

-- Recommendations -------------------------------------------------------------
INSERT INTO public.recommendations
       (user_id, product_id, score, rank, model_version, features, created_at, updated_at)
SELECT u.id,
       p.id,
       r.score,
       CASE WHEN r.r3 < 0.03 THEN NULL ELSE 1 + (r.i % 20)::int END,
       CASE WHEN r.r3 > 0.98 THEN NULL
            ELSE (ARRAY['model-a-2024.06','model-a-2024.07','model-b-1.3'])[1 + (r.i % 3)::int] END,
       CASE WHEN r.r4 < 0.05 THEN NULL
            ELSE jsonb_build_object(
                   'ctr',        round(r.r4::numeric / 4, 4),
                   'source',     (ARRAY['model-a','model-b','popular','similar-items'])[1 + floor(r.r5 * 4)::int],
                   'dwell_s',    round((r.r5 * 120)::numeric, 1),
                   'cold_start', r.r3 < 0.1) END,
       :'batch_ts'::timestamptz,
       :'batch_ts'::timestamptz
FROM (
    -- Each row draws its random values exactly once here; OFFSET 0 is an
    -- optimisation fence so the draws are never inlined into the join conditions.
    SELECT i,
           1 + floor(random() * :cnt_users)::bigint    AS urn,
           1 + floor(random() * :cnt_products)::bigint AS prn,
           round(random()::numeric, 6)::float8         AS score,
           random() AS r3, random() AS r4, random() AS r5
    FROM generate_series(1, :n_recs) AS i
    OFFSET 0
) AS r
JOIN gen_users    AS u ON u.rn = r.urn
JOIN gen_products AS p ON p.rn = r.prn;

COMMIT;

ANALYZE public.users;
ANALYZE public.products;
ANALYZE public.recommendations;
