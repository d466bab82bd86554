"""The Hugging Face Hub: publishing a run folder (``upload``), loading and verifying what was published
(``load``), and its model card (``model_card``)."""
from sdzoo.hub.load import (CheckpointMismatchError, HubError, VerificationError, check_onnx_matches, load_run,
                            verify_upload)
from sdzoo.hub.upload import MissingTokenError, PublishResult, UploadError, publish

__all__ = ["publish", "PublishResult", "load_run", "verify_upload", "check_onnx_matches", "HubError",
           "CheckpointMismatchError", "VerificationError", "MissingTokenError", "UploadError"]
