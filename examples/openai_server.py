"""Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) over
tiny numpy models shipped in tiny_lm.py, and call it with the official openai client:
a chat answer whole and streamed, a completion, and an unknown model's error.
Run: pip install "servekit[fastapi]" openai && python examples/openai_server.py
(to keep it serving for other clients: cd examples && servekit run openai_app:build)"""

import openai
from openai_app import build  # a module: sent by reference, never pickled

import servekit as serve

client = serve.start(http_options={"port": 8000})
build(client)  # the backend "openai" and the endpoint at /v1

llm = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
print("models:", [model.id for model in llm.models.list()])
question = [{"role": "user", "content": "Speak, friend."}]
answer = llm.chat.completions.create(model="tiny-bard", messages=question, seed=7)
print("chat:", {"content": answer.choices[0].message.content,
               "finish_reason": answer.choices[0].finish_reason,
               "completion_tokens": answer.usage.completion_tokens})
stream = llm.chat.completions.create(model="tiny-bard", messages=question, seed=7,
                                     stream=True)
pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
print("streamed:", {"content": "".join(pieces), "chunks": len(pieces)})
recipe = llm.completions.create(model="tiny-chef", prompt="Whisk the", max_tokens=200, seed=1,
                                stop=[","])
print("completion:", {"text": recipe.choices[0].text,
                     "finish_reason": recipe.choices[0].finish_reason})
try:
    llm.chat.completions.create(model="gpt-4o", messages=question)
except openai.NotFoundError as error:
    print("unknown model:", {"status": error.status_code, "code": error.body["code"]})
client.shutdown()
