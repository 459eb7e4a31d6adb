"""What schemathesis cannot make from openapi.yaml alone, loaded by tests/it/fuzz.rs: the body
of a resumable upload's PATCH is raw bytes (application/offset+octet-stream)."""

from hypothesis import strategies as st
import schemathesis

schemathesis.openapi.media_type("application/offset+octet-stream", st.binary(max_size=4096))
