"""Pure code: decoding, preprocessing, models, scorer and trainer classes, metrics.

Nothing in this package imports Ray or touches storage; callers hand it bytes, arrays and
pyarrow tables and get the same back.
"""
