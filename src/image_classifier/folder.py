"""A user's image folder as a data set: copied into data/raw by fetch, decoded and resized by preprocess."""
