"""The serving wing on Ray Serve: the ingress and one deployment per model (`deployments`), and the stand-in
for a pipeline that runs in a model's replica (`remote_pipeline`)."""
