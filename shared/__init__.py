"""Message schemas, settings and errors shared by functions/ and worker/."""
