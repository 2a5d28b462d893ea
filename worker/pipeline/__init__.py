"""The stages an event meets, in order: fetch, decode, dedupe, batch, dispatch, write, commit."""
