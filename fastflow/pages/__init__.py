"""Pages: what people read (figures, model card, study note and page, the report's rows and rendering).
May import runtime, data, core and engine; no I/O of stores."""
