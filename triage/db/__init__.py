"""SQLAlchemy models, engine and session scope, migrations and keyword-only queries."""
