"""mode=predict: batch prediction over a data set, decoded and computed on the data workers, written as Parquet."""
