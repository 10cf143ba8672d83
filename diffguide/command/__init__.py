"""Command plumbing shared by the entry points: config composition and schema, the checks before any work (one
line per mistake), the secondary commands' wrapper, the Ctrl-C hook while the libraries import."""
