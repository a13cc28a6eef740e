"""Test helpers: run the real launcher, read real event files, train the single-process reference."""
