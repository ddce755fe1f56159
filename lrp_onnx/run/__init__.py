"""Running a converted model: runner and session, generation and dataset attribution, text, heatmaps."""
