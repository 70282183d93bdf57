"""Cloud providers whose API yields a snapshot download link."""
