"""The worker side of the request path: a job taken from the queue (``consumer``), decoded and prepared by the
model's recipe (``preprocess``), batched across jobs (``batcher``), run by an engine (``engine``) and turned into
a result (``report``, ``interpret``), the whole chain being ``pipeline``; ``artifacts`` puts the export on disk.

Separate from the gateway because it is the only part that needs the model and its runtime (ONNX Runtime or
torch) and it scales on its own; the gateway's side uses only ``preprocess`` (a PNG overlay's picture, through
``service.outputs.formats``). Nothing is imported here, so that import loads no engine.
"""
