"""Start servekit, put a small model behind an endpoint, call it over HTTP and a handle."""

import json
import urllib.request

import servekit as serve


class SentimentModel:
    """A toy model: counts happy and sad words."""

    def __init__(self, happy_words):
        self.happy_words = set(happy_words)

    def __call__(self, request):
        text = request.query_params["text"]
        words = text.lower().split()
        score = sum(word in self.happy_words for word in words) / max(len(words), 1)
        return {"text": text, "positive": score > 0, "score": round(score, 3)}


def main() -> None:
    client = serve.start(http_options={"port": 8000})
    client.create_backend("sentiment:v1", SentimentModel, ["good", "great", "happy"],
                          config={"num_replicas": 2})
    client.create_endpoint("sentiment", backend="sentiment:v1", route="/sentiment")

    url = "http://127.0.0.1:8000/sentiment?text=what+a+great+day"
    with urllib.request.urlopen(url) as response:
        print("HTTP:  ", json.loads(response.read()))

    handle = client.get_handle("sentiment")
    print("handle:", handle.remote(text="a sad and rainy day").result(timeout=10))
    client.shutdown()


if __name__ == "__main__":
    main()
