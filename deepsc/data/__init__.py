"""CT data layer: reading scans, the synthetic cohort, validation, preprocessing, analysis."""
