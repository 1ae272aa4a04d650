"""DICOM input: single files, multi-frame files and series (several files or a zip), in every transfer syntax the
installed decoders handle.

A read runs in three steps, one module each, so each can be read and changed alone: ``headers`` reads and checks every
file's header cheaply (large values stay unread), ``series`` checks the headers against each other, orders the slices
and assembles the volume, and ``pixels`` decodes each file's pixel data into it. The limits, the series' consistency
and the slice order are thus settled on headers alone, before anything is allocated (the gateway's ``probe`` stops
there), and peak memory is the volume plus one file. Error messages name files, never header values: headers carry
patient data.
"""

from service.inputs.dicom.series import decode, probe, select

__all__ = ["decode", "probe", "select"]
