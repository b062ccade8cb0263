"""What predict and serve share (the upload-and-test core) and serve's request handling: below the commands."""
