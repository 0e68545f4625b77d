"""The seed's job queue (§3): enqueue, claim, lease and process jobs."""
