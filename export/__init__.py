"""Export of trained CSC-CTRL models to inference graphs."""
