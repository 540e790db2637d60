"""What the commands print and write: tables, JSON, report files, plots."""
