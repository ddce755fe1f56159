"""What AttnLRP decides: relevance path and units, pattern fusion, rules, affine layers, seed targets."""
