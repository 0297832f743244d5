"""The benchmark: tasks x methods x lengths, stored in SQLite, with reports."""
