"""The data stage: stream a corpus, clean, filter, deduplicate, train a tokenizer, pack shards."""
