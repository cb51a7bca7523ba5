"""The Files API (`/v1/files`): uploads, their metadata in the database, their content in a
`FileStore` (docs/files.md)."""
