"""Results as DICOM for a PACS: a Structured Report and a Secondary Capture overlay (`sr`, `overlay`),
and a node that takes studies from a PACS and stores the results back (`node`)."""
