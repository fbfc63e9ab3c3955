"""Knowledge bases: documents read and chunked (documents), indexed and searched (index)."""
