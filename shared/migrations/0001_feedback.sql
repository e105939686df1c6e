-- Impressions (what a user was shown) and likes (what they picked from it).
--
-- "generation" names the batch of results a list came from. Results carry no
-- generation id yet, so it holds the result's generated_at as ISO-8601 UTC text.

CREATE TABLE impressions (
    impression_id uuid PRIMARY KEY,
    user_id       bigint      NOT NULL CHECK (user_id >= 0),
    playlists     bigint[]    NOT NULL,
    generation    text        NOT NULL,
    model_version text        NOT NULL,
    cold          boolean     NOT NULL,
    shown_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX impressions_shown_at ON impressions (shown_at);
CREATE INDEX impressions_user_shown_at ON impressions (user_id, shown_at);

CREATE TABLE feedback (
    like_id       uuid PRIMARY KEY,
    impression_id uuid        NOT NULL REFERENCES impressions (impression_id),
    user_id       bigint      NOT NULL CHECK (user_id >= 0),
    playlist_id   bigint      NOT NULL,
    rank          integer     NOT NULL CHECK (rank >= 1),
    liked_at      timestamptz NOT NULL DEFAULT now(),
    -- Liking the same shown playlist twice is one like.
    UNIQUE (impression_id, playlist_id)
);

CREATE INDEX feedback_liked_at ON feedback (liked_at);
