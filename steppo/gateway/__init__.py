"""The agent gateway: an OpenAI-compatible endpoint in front of the policy that turns every LLM
call of an existing agent into a step record with exact tokens (`sessions`), and a data pool of
finished trajectories on disk (`pool`) the trainer consumes. `server` is the HTTP layer,
`service` the batching and request handling."""
