"""Training data: the tfrecord format (`schema`), the corpus encoder (`encode`, `layout`) and the reader
used by training (`pipeline`)."""
