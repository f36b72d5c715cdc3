"""Running packed models: SpQRLinear, loading, sibling fusion, generation."""
