"""The same deployment as deploy.yaml, declared by a function: `servekit run app:build`."""

from models import Sentiment


def build(client):
    client.create_backend("sentiment:v1", Sentiment, 0.5, config={"num_replicas": 2})
    client.create_endpoint("sentiment", backend="sentiment:v1", route="/sentiment",
                           methods=["GET", "POST"])
