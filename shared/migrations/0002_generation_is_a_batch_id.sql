-- Results now come from generations (one per batch): impressions.generation holds the
-- generation's batch id, no longer the result's generated_at.

COMMENT ON COLUMN impressions.generation IS
    'generation the list was read from: the id of the batch that produced it, or live';
COMMENT ON COLUMN impressions.model_version IS 'model version that ranked the list';
CREATE INDEX impressions_generation ON impressions (generation);
