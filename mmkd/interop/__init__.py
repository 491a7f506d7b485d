"""open_clip <-> transformers: exact conversion both ways (one key table) and the preprocessing mapping."""
