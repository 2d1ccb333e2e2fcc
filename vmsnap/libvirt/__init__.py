"""libvirt domains: save images in and out (image), the domain adapter (domain)."""
