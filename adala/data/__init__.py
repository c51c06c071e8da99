"""Data: webdataset shards written from the data sets' own layouts (``python -m adala.data write``), read per rank
as resumable training streams and exactly-once evaluation streams (``adala.data.pipeline``), with the paper's
transforms (``adala.data.transforms``) and the built-in demo's procedural data set."""
