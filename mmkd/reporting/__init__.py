"""What mmkd shows people: model cards, Markdown tables, plots, the compression report, the hardware line."""
