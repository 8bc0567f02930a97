"""Raw text -> cleaned documents -> sentencepiece tokens -> Arrow shards + manifest -> packed loader."""
