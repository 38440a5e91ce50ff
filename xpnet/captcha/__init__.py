"""The CAPTCHA application on top of the library: configurations, data plans, the training job, ``Recognizer``."""
