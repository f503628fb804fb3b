"""Pure tensor math, no communication: compressors and their inverses."""
