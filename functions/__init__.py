"""Azure Functions trigger blueprints: parse platform input into worker messages."""
