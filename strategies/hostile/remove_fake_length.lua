-- table.remove from the front of a table whose __len claims 2^40 elements.
return { plan = function(ctx)
    local t = setmetatable({}, { __len = function() return 1 << 40 end })
    table.remove(t, 1)
    return { ports = ctx.ports }
end }
