"""The end of the request path: what a caller gets back beyond the JSON. ``formats`` makes DICOM SEG, NIfTI and
PNG on request from what the worker kept; ``rle``, ``writers``, ``dicom_headers``, ``dicom_seg``, ``seg_sources``
and ``deidentify`` are the format codecs, pure functions where the format allows; ``forwarding`` sends SEGs on to
a PACS (STOW-RS).

Separate because the gateway and the worker both use it (results are made where they are asked for). Nothing is
imported here: the gateway must never load highdicom (``dicom_seg``), which only the first SEG needs.
"""
