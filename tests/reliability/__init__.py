"""The README's Reliability table and the cases that produce it (issue 14 item 12)."""
