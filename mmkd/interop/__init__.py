"""open_clip <-> transformers: exact model conversion in both directions and the preprocessing mapping."""
