"""HTTP layer: pydantic schemas, thin routes, the app factory and error mapping."""
