"""The model of the deploy-file and `servekit run` examples."""


class Sentiment:
    def __init__(self, threshold):
        self.threshold = threshold

    def __call__(self, request):
        text = request.query_params.get("text", "")
        score = 1.0 if "great" in text else 0.0
        return {"text": text, "positive": score > self.threshold}
