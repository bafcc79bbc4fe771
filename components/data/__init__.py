"""Images in: ingest a source into a dataset copy and manifest, validate it (Great Expectations),
preprocess an image exactly as it will be served, and the views and augmentation training draws from."""
